"""openpluto.train"""
