"""openpluto.ssl"""
