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
    kv_handoff.py     the engine's P/D part (`Engine.kv`): KV blocks imported / exported, held hand-offs
    kv_transfer.py    P/D between servers: roles, layouts, KvPusher, KvIntake, KvHolds
    scheduler.py      continuous batching: decodes first, prefill chunks fill the token budget; preemption
    runner.py         ScheduledBatch -> one packed forward pass of transformers' model
    attention.py      paged attention, registered with transformers' AttentionInterface (torch backend)
    paged_flex.py     FlexAttention over the paged cache in place (the flex backend; CUDA's default)
    kv_cache.py       the paged KV cache and its block allocator
    sizing.py         KV sizing arithmetic (torch-free; dvd plan uses it too); memory_profile.py sizes a
                      GPU's cache from its free memory after a profiling forward
    prefix_cache.py   full KV blocks shared by a hash of their tokens and images' content keys; LRU
    sampling.py       the whole batch's greedy / temperature / top-k / top-p / min-p / penalties / seeds on the
                      logits' device (no stop strings: they act on text, so the gateway's detokenizer decides)
    tensor_parallel.py, tp_serve.py   the LLM over N ranks: shards, lockstep, `dvd language --tp N`
    request.py        EngineRequest (RequestStatus), PromptPiece, RequestOutput
    model.py          LanguageHalf (the checkpoint's *ForCausalLM); SamplingParams is dvd.sampling's
"""
