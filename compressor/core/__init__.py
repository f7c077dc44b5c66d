"""The core: layer handlers, factored layers, SVD, rank policies, the plan and the rewrite.

Nothing here imports from the rest of compressor; every other stage builds on it.
"""
