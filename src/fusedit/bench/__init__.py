"""``fusedit bench``: training and sampling throughput of FuseDiT on synthetic inputs with random weights, measured on
the production code (the trainer's step functions, the pipeline's denoising loop).

* :mod:`~fusedit.bench.presets`: model + input geometries (tiny ... FuseDiT-2B) and their synthetic inputs;
* :mod:`~fusedit.bench.flops`: analytic model FLOPs (for MFU) and peak FLOP/s;
* :mod:`~fusedit.bench.timing`: interleaved timing, paired speed-ups, peak memory;
* :mod:`~fusedit.bench.runs`: building a run and :func:`~fusedit.bench.runs.run_bench`.

The command line is :mod:`fusedit.commands.bench`.
"""
