"""The dictionary: a TopK SAE on the store's activations, and what its features are.

* :mod:`.sae`: the TopK SAE, its sparse encode/decode and its on-disk format;
* :mod:`.saelens`: the SAELens layout: export ours, import a published SAE as the primary;
* :mod:`.sae_training`: train it by streaming the store (AuxK, checkpoints, exact resume, ranks);
* :mod:`.metrics`: reconstruction metrics over a held-out split (FVU, dead latents, ...);
* :mod:`.features`: where each feature fires hardest, traced back to its text and token;
* :mod:`.feature_labels`: short names for features from their top tokens.
"""
