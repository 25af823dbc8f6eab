"""The lab beside the core: the paper harness (`python -m lab.paper`), its report and Fig. 4's embedding.

It imports `wmdd` and the stage scripts' command lines; nothing in `wmdd/` imports it.
"""
