"""Quantization-aware training by self-distillation, the library under train_qat.py:

    config   the train flags and their rules, RunSettings (decide the weights) and RunOptions (how a run is carried out)
    data     teacher data (gen-data), the training token stream, its windows and their order, held-out tokens
    student  the fake-quant student built from the float model and a PTQ start, and its export
    loop     losses, learning-rate schedule, one optimizer step, evaluation, a whole run
    runs     the run folder: checkpoints, state.json, log, curves, resume, export of the latest checkpoint
"""
