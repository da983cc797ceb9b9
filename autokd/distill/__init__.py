"""autokd.distill"""
