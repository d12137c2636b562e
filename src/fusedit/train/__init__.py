"""fusedit.train"""
