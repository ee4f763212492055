"""openpluto.embed"""
