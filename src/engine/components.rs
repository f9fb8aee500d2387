//! Connected-component labelling, the one implementation for 2-D slices (SAM's small-region clean-up,
//! 8-connectivity) and 3-D volumes (the 3-D clean-up, 26-connectivity): full connectivity in both.

/// Label the components of the voxels where `is_fg(index)` holds, in a z-major `dims` = [nz, ny, nx]
/// grid, with full connectivity (26 neighbours; 8 in-plane when nz = 1). Returns (labels, sizes): label 0
/// is background, components are numbered from 1 in scan order and `sizes[l]` counts label l.
pub fn label_components(dims: [usize; 3], is_fg: impl Fn(usize) -> bool) -> (Vec<u32>, Vec<usize>) {
    let [nz, ny, nx] = dims;
    let n = nz * ny * nx;
    let mut labels = vec![0u32; n];
    let mut sizes = vec![0usize];
    let mut stack = Vec::new();
    for start in 0..n {
        if !is_fg(start) || labels[start] != 0 {
            continue;
        }
        let l = sizes.len() as u32;
        sizes.push(0);
        labels[start] = l;
        stack.push(start);
        while let Some(p) = stack.pop() {
            sizes[l as usize] += 1;
            let z = (p / (ny * nx)) as isize;
            let y = ((p / nx) % ny) as isize;
            let x = (p % nx) as isize;
            for dz in -1..=1isize {
                for dy in -1..=1isize {
                    for dx in -1..=1isize {
                        let (zz, yy, xx) = (z + dz, y + dy, x + dx);
                        if zz < 0 || yy < 0 || xx < 0 || zz >= nz as isize || yy >= ny as isize || xx >= nx as isize {
                            continue;
                        }
                        let q = (zz as usize * ny + yy as usize) * nx + xx as usize;
                        if labels[q] == 0 && is_fg(q) {
                            labels[q] = l;
                            stack.push(q);
                        }
                    }
                }
            }
        }
    }
    (labels, sizes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diagonal_neighbours_join_in_2d_and_across_slices() {
        // 2-D: a diagonal pair is one component (8-connectivity), a far pixel another.
        let fg = [1u8, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let (labels, sizes) = label_components([1, 4, 4], |i| fg[i] != 0);
        assert_eq!(sizes, vec![0, 2, 1]);
        assert_eq!((labels[0], labels[5], labels[15]), (1, 1, 2));
        // 3-D: (0,0,0) and (1,1,1) touch by a corner (26-connectivity).
        let mut v = [0u8; 8];
        v[0] = 1;
        v[7] = 1;
        assert_eq!(label_components([2, 2, 2], |i| v[i] != 0).1, vec![0, 2]);
    }
}
