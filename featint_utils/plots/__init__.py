"""Every figure the notebooks show: tidy data in, a matplotlib Figure out, one theme.

* :mod:`.style`: the theme, palette and fixed colours;
* :mod:`.figure`: what every figure shares: the theme applied per figure, ``save`` (PNG + SVG), formats, names;
* :mod:`.training`: 00, 01, 04: activation norms, training curves, firing density;
* :mod:`.residual_fits`: 02, 03: fit curves, the baseline ladder, the shares and their null, power, attribution;
* :mod:`.stimulus_effects`: 05: manipulation checks, a feature per condition, the effect volcano;
* :mod:`.clamps`: 06: dose-response, 2x2 plots, the effect forest with controls;
* :mod:`.comparisons`: across runs: a sweep's comparison, the planted benchmark's flag rates.
"""
