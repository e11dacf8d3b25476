"""The method as pure functions over a group and a model: calibrate, evaluate, sensitivity and
allocation, sweep, alpha-beta projection. No job context: the job kinds in ``launch.kinds`` call these."""
