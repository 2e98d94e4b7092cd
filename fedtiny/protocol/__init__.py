"""fedtiny's wire protocol as a sans-IO core: bytes in, bytes out, no sockets (see docs/protocol.md).

    topics     topic tree and numeric ids of names
    messages   message types and their fixed-layout bodies
    delta      sparse quantized delta encoding
    envelope   header, EdDSA (BLAKE2b) signature, ChaCha20-Poly1305 encryption, replay protection (version 2)
    chunking   split payloads into MQTT-sized chunks and reassemble them
    keys       provisioning of identities, TLS certificates, mosquitto password and ACL files
    brokers    (transport plumbing, not core) start amqtt in-process or mosquitto as a subprocess
"""

from fedtiny.protocol.errors import ProtocolError

__all__ = ["ProtocolError"]
