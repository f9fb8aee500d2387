# DeSAMLib: the plain-Python half of the DeSAM Slicer module (no slicer/qt/vtk imports).
