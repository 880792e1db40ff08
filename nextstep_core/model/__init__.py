"""The network: what a NextStep checkpoint's tensors are, and nothing about how a generation uses them.

    decoder.py   the Qwen2.5-style decoder (GQA attention, RoPE, RMSNorm, SwiGLU), the image projectors: `NextStep`
    head.py      the flow-matching head (AdaLN MLP): the velocity of one image token
    vae.py       the f8ch16 autoencoder (BFL keys) and its latent normalisation
    merge.py     q/k/v and gate/up merged into one layer each, with the published keys kept
    family.py    what differs between NextStep-1 and NextStep-1.1 (grids, schedules, BOS, noise order)
"""
