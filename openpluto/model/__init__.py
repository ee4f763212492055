"""openpluto.model"""
