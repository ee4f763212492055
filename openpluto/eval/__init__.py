"""openpluto.eval"""
