"""The Ray Serve application over the pipeline classes: `deploy/app.py` (ingress + model deployment), configs."""
