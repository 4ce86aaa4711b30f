"""Generation: the continuous-batching engine and its background loop, parameters and token selection, chat
templates, streamed detokenisation.

    engine.py     Engine: sequences join and leave the running batch at every step; the slot KV cache
    loop.py       EngineLoop: one engine driven by a background thread, shared by every caller of a pipeline
    sampling.py   GenerationParams (transformers' resolution), logits processors, seeded sampling, stop strings
    chat.py       chat templates rendered as transformers renders them (jinja2 sandbox)
    streaming.py  TextStream: token ids -> text deltas, holding back split multi-byte characters
"""
