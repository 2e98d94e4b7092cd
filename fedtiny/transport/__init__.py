"""The edges of the protocol: MQTT (paho) and the fault-injecting wrapper tests and simulations use."""
