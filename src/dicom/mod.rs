//! DICOM in and out: MR series → Volume, DICOM-SEG writer and reader, UIDs and value formatting.
