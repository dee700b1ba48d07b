"""optistack"""
