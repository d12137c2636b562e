"""fusedit.data"""
