"""autokd.store"""
