"""The data side: models, the texts they read, and one layer's activations on disk.

* :mod:`.models`: load a model (the embedded MiniLM, a local directory, a hub name, a planted model) and map
  "layer L" to the module whose output is ``hidden_states[L]``; capture a layer;
* :mod:`.planted_model`: a planted encoder built in-process from a seed, with known features, a known
  integration and its own 2x2 stimulus set;
* :mod:`.corpus`: texts (the stimulus set, local files, hub datasets) and their split by document;
* :mod:`.distributed`: which process this is under ``torchrun``, its device, the collectives the stages use;
* :mod:`.extraction`: write one layer's activations into a store (also from arrays, an ``.npz``, or derived);
* :mod:`.activation_store`: read a finished store, checked against its manifest, and stream its batches;
* :mod:`.interventions`: splices: replace a layer's output during a forward pass, and what that does to
  the output.
"""
