"""Generation: settings in, image tokens out, one token at a time.

    settings.py  SamplerSettings: every setting of a generation, its validation, the families' defaults
    plan.py      GenerationPlan: the settings resolved against a model and its prompts, once per call
    prompt.py    the prompt layout of every guidance row, patchify / unpatchify
    sampling.py  the head samplers' update rules, guidance and its schedules, HeadPlan, sample_token
    loop.py      sample(): prompts and guidance rows, prefill, then the per-token loop
    noise.py     where the head's noise comes from (independent per image, or the reference's draws)
    keep.py      teacher forcing: tokens kept as given (reroll, inpaint)
    compile.py   optional torch.compile of the head's step
    graph.py     the per-token step on static buffers, captured as a CUDA graph and kept between calls
    memory.py    what a generation needs, refused up front when it cannot fit
"""
