"""fusedit.reference"""
