"""The hub: stores, validates and aggregates a fleet's deltas and publishes adapter versions."""

# Threads that run the handlers' blocking work (anyio's default is 40), and as many again that check uploads
# (app.state.upload_threads: one hop per upload, the commit awaited on the event loop; hub/accept.py). With 40
# contending for the GIL the event loop waited its turn after every hop: 64 concurrent uploads ran at 100/s with 13 ms
# of hub CPU each, against 173/s and 6.4 ms with 2 threads, before the upload path took one hop (quiet machine). Two,
# not one, so that an aggregation or a bundle upload running in one leaves the other to requests.
REQUEST_THREADS = 2
