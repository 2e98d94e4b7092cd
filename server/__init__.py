"""The Flower coordinator that reaches devices over MQTT (see docs/deployment.md).

    grid        FleetGrid: a flwr Grid whose nodes are the fleet's devices (quorum, deadline, stale replies)
    requantize  float master <-> the devices' int8/int32 tensors at their fixed per-channel scales
    rounds      strategies by name and the resumable round loop (Coordinator), server-side evaluation
    fedbuff     FedBuff: buffered semi-asynchronous aggregation with staleness weighting
    state       the SQLite checkpoint        ops      JSON-lines logs, Prometheus endpoint
    app         the Flower ServerApp         gateway  a site gateway ClientApp (scale-out)
    cli         `fedtiny coordinator`, `fedtiny broker-config`
    testing     a fake fleet link and clock for tests and benchmarks
"""
