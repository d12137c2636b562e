"""fusedit.eval"""
