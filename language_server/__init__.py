"""The language half as a server: LLM only, fed by image features that arrive over the transport.

    server.py         LanguageServer: receiver, feeder, engine loop and gRPC service built together; admission,
                      output streams, stage stamps, drain
    service.py        the Language gRPC service: proto <-> GenerateCall / GenerateOutput (generation.py), errors
                      -> statuses; translates only
    feeder.py         a request's frames -> prompt pieces, in slot order, as they arrive (slot expansion by
                      dvd.prompt.ImageTokens)
    feature_pool.py   received features keyed by request id (before or after Generate; handed over in image
                      order; bounded; TTL)
    engine_loop.py    the engine's own thread; outputs handed back to the event loop
    engine.py         step() = schedule -> execute -> postprocess; add/extend/abort; num_* counters
    scheduler.py      continuous batching: decodes first, prefill chunks fill the token budget; preemption
    runner.py         ScheduledBatch -> one packed forward pass of transformers' model
    attention.py      paged attention, registered with transformers' AttentionInterface
    kv_cache.py       the paged KV cache and its block allocator
    prefix_cache.py   full KV blocks shared by a hash of their tokens and images' content keys; LRU
    sampling.py       per-request greedy / temperature / top-k / top-p / repetition penalty / seed (no stop
                      strings: they act on text, so the gateway's detokenizer decides them)
    request.py        EngineRequest (RequestStatus), PromptPiece, RequestOutput
    model.py          LanguageHalf (the checkpoint's *ForCausalLM); SamplingParams is dvd.sampling's
"""
