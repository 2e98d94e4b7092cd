"""The Flower coordinator that reaches devices over MQTT."""
