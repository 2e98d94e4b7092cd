"""Coverage-guided fuzzing of every decoder that takes bytes from the network (atheris, libFuzzer).

    python tests/fuzz/fuzz_decoders.py [libFuzzer flags, e.g. -runs=20000 -max_len=1024] [corpus dirs]

A decoder may accept the input or raise ProtocolError; anything else (another exception, a crash) is a
finding: libFuzzer stops, writes the input to crash-*, and exits nonzero. The golden protocol fixtures seed
the corpus, so mutations start from well-formed envelopes, chunks and delta blobs and reach deep paths.
tests/test_protocol_codec.py runs this for a bounded number of inputs.
"""

import os
import sys

os.environ.setdefault("FEDTINY_FUZZ", "1")

import atheris  # noqa: E402

with atheris.instrument_imports():
    from fedtiny.protocol import chunking, delta, topics  # noqa: E402
    from fedtiny.protocol.envelope import CoordinatorEndpoint, DeviceEndpoint, Identity  # noqa: E402
    from fedtiny.protocol.errors import ProtocolError  # noqa: E402
    from fedtiny.protocol.messages import decode_body  # noqa: E402

FLEET, DEVICE = topics.name_id("lab"), topics.name_id("dev-001")
COORD, DEV = Identity.from_seed(b"fixture coordinator"), Identity.from_seed(b"fixture dev-001")


def endpoints():
    return (DeviceEndpoint(FLEET, DEVICE, DEV, COORD.public),
            CoordinatorEndpoint(FLEET, COORD, {DEVICE: DEV.public}))


def one_input(data: bytes) -> None:
    device, coordinator = endpoints()  # fresh each time: a finding must not depend on earlier inputs
    decoders = (coordinator.open, device.open, delta.decode_delta, chunking.parse_chunk,
                lambda b: chunking.Reassembler().accept(b, 0.0, "dev"),
                lambda b: decode_body(b[0] if b else 0, b[1:]))
    for decode in decoders:
        try:
            decode(data)
        except ProtocolError:
            pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
