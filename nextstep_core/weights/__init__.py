"""Checkpoints: finding, checking and streaming the published files into the model, and writing them back out.

    config.py      typed model / VAE configs from config.json
    identify.py    what a checkpoint is (model or VAE) and its family, with the reason
    loading.py     load_model: discovery, validation, streaming load; st_io.py reads tensors without mmap
    vae_files.py   load_vae: the VAE's folder or file
    tokenizer.py   the model's tokenizer and its special tokens
    quant.py       int8 / fp8 / int4 weights (quant_int4.py: int4's layouts, quant_fp8.py: fp8's tensor-core
                   product), kernels chosen at load
    cpu_pack.py    dense weights laid out once for the CPU's matmul
    convert.py     the streaming single-file converter
    download.py    the one Hugging Face download
    testing.py     random checkpoints in the official layout, for tests, demos and benchmarks
"""
