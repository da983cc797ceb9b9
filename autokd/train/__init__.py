"""autokd.train"""
