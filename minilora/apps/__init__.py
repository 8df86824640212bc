"""The apps: what the `minilora` command runs (demo, pretrain, figures, reports, simulators).

They sit above the library: an app may import any library module (backend, io, quant, nn, optim, peft, data,
memory, train, pretrained, plotting), and no library module imports an app (tests/test_architecture.py).
"""
