"""openpluto.slide"""
