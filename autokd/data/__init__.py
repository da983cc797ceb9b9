"""autokd.data"""
