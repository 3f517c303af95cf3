"""Data on the accelerator: dataset readers, weighted sampling, SMC's augmentation and resize-and-paste
mixing, and the loader backends behind one interface (loader.py, batch.py). Importing it loads no heavy library.

    from mixtail.pipelines.loader import build_loader
"""
