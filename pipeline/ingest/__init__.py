"""Live ingest: learning from streams pushed over gRPC (proto/lamina/v1/ingest.proto), exactly once.

    frames.py   one pushed frame decoded (raw, PNG, JPEG) and brought to the run's frame shape
    clips.py    a stream cut into clips of T frames overlapping by one ([Note: live clips])
    buffer.py   the bounded buffer, its drop policy, and micro-batches from it ([Note: live micro-batches])
    wal.py      the write-ahead log of micro-batches ([Note: the ingest write-ahead log])
    source.py   the live Source: micro-batch m formed once, written ahead, replayed from the log
    server.py   the gRPC server: Push and Watch, bearer token, TLS
    stats.py    what the ingest counts: the Watch rpc and Ray gauges
    serve.py    `lamina serve`: a training run whose source is the ingest
    push.py     `lamina push`: any data spec pushed as live streams
    proto/      generated from proto/lamina/v1/ (committed; see that file for the command)

The compute (workers/) never sees any of this: a live micro-batch is a MicroBatch like any other.
"""
