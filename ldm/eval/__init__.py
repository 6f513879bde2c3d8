"""Evaluation: metrics over torchmetrics, cached reference statistics and the checkpoint evaluator behind `ldm-eval`.

    feature_extractors  InceptionV3 / CLIP loading (local paths, offline errors) and their identities
    sources             shard sets read in order, prompt sets, image conversions
    reference_stats     real-image FID/KID states, computed once and cached by everything that changes them
    metrics             GenerationMetrics (FID, KID, CLIP score, shapes adherence), ReconstructionMetrics
    shapes_adherence    the deterministic colour / shape reader for the `shapes` data set
    loading             checkpoints and exports by path or glob, each read once (pipeline or autoencoder)
    results             results.jsonl / results.csv, printed rows, the W&B table of samples
    evaluator           EvalConfig, evaluate(cfg) -> rows: the run loop

Modules are imported where used (`from ldm.eval.evaluator import evaluate`), so importing one stays light.
"""
