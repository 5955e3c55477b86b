"""The language half as a server: LLM only, fed by image features that arrive over the transport.

    service.py        Language gRPC service + server lifecycle (features wait, slot expansion, streaming)
    feature_pool.py   received features keyed by request id (before or after Generate; bounded; TTL)
    engine_loop.py    the engine's own thread; outputs handed back to the event loop
    engine.py         step() = schedule -> execute -> postprocess; add/abort; num_* counters
    scheduler.py      continuous batching: decodes first, prefill chunks fill the token budget; preemption
    runner.py         ScheduledBatch -> one packed forward pass of transformers' model
    attention.py      paged attention, registered with transformers' AttentionInterface
    kv_cache.py       the paged KV cache and its block allocator
    sampling.py       per-request greedy / temperature / top-k / top-p / repetition penalty / seed (no stop
                      strings: they act on text, so the gateway's detokenizer decides them)
    request.py        EngineRequest (RequestStatus), RequestOutput
    model.py          LanguageHalf (the checkpoint's *ForCausalLM); SamplingParams is dvd.sampling's
"""
