"""What sites, server and tools share, free of FLARE and of any network.

- :mod:`.atomic`: writes that readers never see half-done.
- :mod:`.reports`: checks of the numbers a site reports.
- :mod:`.results`: the run's machine-readable result files and their tables.
- :mod:`.summaries`: summaries of per-round curves and per-site figures.
"""
