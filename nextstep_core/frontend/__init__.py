"""What a person touches: the command line and the one-call Python API, and the files they read and write.

    cli.py          python -m nextstep_core info | generate | convert (every input checked before loading)
    info.py         describe a model or VAE from its headers
    pipeline.py     generate(): encode edits, sample, decode
    images.py       the one image reader, edit encoding, VAE encode / decode
    keep_inputs.py  the command line's init image / latents and mask files
    outputs.py      output paths checked up front (written whole by ../fs.py)
    devices.py      device strings: parse, check, auto-pick
"""
