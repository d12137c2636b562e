"""fusedit.dist"""
