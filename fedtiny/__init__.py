"""fedtiny: federated on-device training for microcontrollers (host library, compiler, protocol, CLI)."""

__version__ = "0.1.0"
