"""The language models and their maths: tensors in, tensors out, no MLflow and no repo paths.

- ``bigram``: the lecture's bigram model (a V x V table of next-token logits), saved and loaded.
- ``gpt``: the lecture's GPT (fused attention beside the plain masked softmax), and its exact
  loss over a whole split (``sliding_window_loss``); ``sizes``: a GPT's architecture and what
  training it costs, without torch (the check stage reads it).
- ``models``: both families behind one door: build from params, save, load, context length.
- ``counts``: bigram counts and the exact losses they give (the optimum any bigram can reach).
- ``tokens``: the vocabulary, the token files and the training batches drawn from them.
- ``training``: the training loops: the lecture's step first, the fast steps beside it, and
  the ``TrainingState`` they change; ``checkpoints``: that state saved and loaded, so that a
  killed run goes on exactly; ``distributed``: several processes training one model (torchrun,
  DistributedDataParallel).
- ``lecture``: the lecture's plain loop, estimate and generate, the reference that the fast
  paths are checked against (tests and benchmarks import it from here); ``lecture_gpt``: the
  lecture's GPT the same way (a module per head), the peer of the GPT's benchmarks.
- ``sampling``: text in, text out (``TextGenerator``), with the checks on every request.
- ``heatmap``: the picture of the next-character probabilities.
"""
