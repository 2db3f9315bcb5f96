"""The hub: stores, validates and aggregates a fleet's deltas and publishes adapter versions."""

# Threads that run the handlers' blocking work (anyio's default is 40). Each upload is a few short hops into the pool;
# with 40 threads contending for the GIL the event loop waited its turn after every hop: 64 concurrent uploads ran at
# 100/s with 13 ms of hub CPU each, against 173/s and 6.4 ms with 2 threads (benchmarks/results/hub_uploads.json,
# quiet machine). Two, not one, so that an aggregation or a bundle upload running in one leaves the other to uploads.
REQUEST_THREADS = 2
