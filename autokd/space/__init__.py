"""autokd.space"""
