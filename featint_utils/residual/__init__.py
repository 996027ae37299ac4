"""The residual question: does what the SAE fails to reconstruct hold pairwise interactions of its features?

* :mod:`.code_data`: each held-out token's SAE code, residual and activation, split by document;
* :mod:`.nfm`: the Neural Factorization Machine on SAE codes (linear + bi-interaction);
* :mod:`.nfm_training`: fit the NFM or a gradient baseline to convergence on the tune set;
* :mod:`.baselines`: closed-form ridges (from the code, the raw activation, explicit pairs) and the MLP;
* :mod:`.targets`: the null control and planted interactions the estimator also fits;
* :mod:`.resampling`: per-document sums and the bootstrap behind every interval;
* :mod:`.interaction`: the nested estimator and its ladder (``run``), over ranks;
* :mod:`.interaction_results`: reading a finished ladder: shares, null, power, headline, verdict;
* :mod:`.contributions`: the ladder's table, which features carry each part of the NFM;
* :mod:`.absorption`: how much of an injected interaction the SAE absorbs; conjunction latents;
* :mod:`.planted`: planted codes and activations with known interactions, for calibration;
* :mod:`.decomposition`: input scale -> primary SAE -> NFM -> secondary SAE, composed once, and the clamp.
"""
