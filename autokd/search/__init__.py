"""autokd.search"""
