"""autokd.models"""
