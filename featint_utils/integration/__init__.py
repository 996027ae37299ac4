"""Integration features: the NFM's interaction embedding, its secondary SAE, and what its features do.

* :mod:`.secondary`: the secondary SAE's data (NFM vectors) and exact pair attribution of a feature;
* :mod:`.manipulation`: checks that each stimulus variant differs in the factor it should, and only that;
* :mod:`.identification`: which features track formality, emotion and their interaction on the stimuli;
* :mod:`.counterfactual`: on token-aligned minimal pairs, what part of a feature's interaction the layer made;
* :mod:`.clamping`: clamp a feature inside the decomposition and read the model's output, with controls.
"""
