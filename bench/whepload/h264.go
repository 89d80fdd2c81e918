package main

import "bytes"

// bitReader reads big-endian bits and Exp-Golomb codes (H.264 7.2 and 9.1).
type bitReader struct {
	data []byte
	pos  int // in bits
	bad  bool
}

func (b *bitReader) u(n int) int {
	v := 0
	for i := 0; i < n; i++ {
		if b.pos >= len(b.data)*8 {
			b.bad = true
			return 0
		}
		v = v<<1 | int(b.data[b.pos/8]>>(7-b.pos%8)&1)
		b.pos++
	}
	return v
}

func (b *bitReader) ue() int {
	zeros := 0
	for b.u(1) == 0 {
		if zeros++; zeros > 31 || b.bad {
			b.bad = true
			return 0
		}
	}
	return 1<<zeros - 1 + b.u(zeros)
}

func (b *bitReader) se() int {
	k := b.ue()
	if k&1 != 0 {
		return (k + 1) / 2
	}
	return -k / 2
}

// h264SPSSize reads width and height (cropping applied) from a sequence parameter set NAL
// unit (H.264 7.3.2.1.1), the same way fanout_viewers.h264_sps_size does; ok is false for a
// truncated SPS or one with scaling matrices (never in constrained baseline).
func h264SPSSize(nal []byte) (width, height int, ok bool) {
	rbsp := bytes.ReplaceAll(nal[1:], []byte{0, 0, 3}, []byte{0, 0}) // emulation prevention
	b := &bitReader{data: rbsp}
	profile := b.u(8)
	b.u(16) // constraint flags, reserved bits, level_idc
	b.ue()  // seq_parameter_set_id
	chroma := 1
	switch profile {
	case 100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135:
		if chroma = b.ue(); chroma == 3 {
			b.u(1) // separate_colour_plane_flag
		}
		b.ue()           // bit_depth_luma_minus8
		b.ue()           // bit_depth_chroma_minus8
		b.u(1)           // qpprime_y_zero_transform_bypass_flag
		if b.u(1) != 0 { // seq_scaling_matrix_present_flag
			return 0, 0, false
		}
	}
	b.ue()          // log2_max_frame_num_minus4
	switch b.ue() { // pic_order_cnt_type
	case 0:
		b.ue() // log2_max_pic_order_cnt_lsb_minus4
	case 1:
		b.u(1) // delta_pic_order_always_zero_flag
		b.se() // offset_for_non_ref_pic
		b.se() // offset_for_top_to_bottom_field
		for i, n := 0, b.ue(); i < n && !b.bad; i++ {
			b.se()
		}
	}
	b.ue() // max_num_ref_frames
	b.u(1) // gaps_in_frame_num_value_allowed_flag
	widthMbs := b.ue() + 1
	heightUnits := b.ue() + 1
	frameMbsOnly := b.u(1)
	if frameMbsOnly == 0 {
		b.u(1) // mb_adaptive_frame_field_flag
	}
	b.u(1) // direct_8x8_inference_flag
	width, height = widthMbs*16, heightUnits*16*(2-frameMbsOnly)
	if b.u(1) != 0 { // frame_cropping_flag
		left, right, top, bottom := b.ue(), b.ue(), b.ue(), b.ue()
		subW, subH := 1, 1
		if chroma == 1 || chroma == 2 {
			subW = 2
		}
		if chroma == 1 {
			subH = 2
		}
		width -= subW * (left + right)
		height -= subH * (2 - frameMbsOnly) * (top + bottom)
	}
	return width, height, !b.bad
}
